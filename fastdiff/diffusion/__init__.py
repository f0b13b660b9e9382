"""fastdiff.diffusion"""
