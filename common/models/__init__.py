"""pdserve.common.models"""
