"""fastdiff.eval"""
