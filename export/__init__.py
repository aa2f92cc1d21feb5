"""mnet.export"""
