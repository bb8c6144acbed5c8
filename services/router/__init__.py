"""pdserve.services.router"""
