"""fastdiff.nn"""
