"""pdserve.services"""
