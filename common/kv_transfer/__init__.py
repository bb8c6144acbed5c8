"""pdserve.common.kv_transfer"""
