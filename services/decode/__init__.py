"""pdserve.services.decode"""
