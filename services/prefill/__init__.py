"""pdserve.services.prefill"""
