"""pdserve.common.engine"""
