"""mnet.search"""
