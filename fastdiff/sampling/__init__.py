"""fastdiff.sampling"""
