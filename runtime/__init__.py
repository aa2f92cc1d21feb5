"""mnet.runtime"""
