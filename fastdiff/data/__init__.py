"""fastdiff.data"""
