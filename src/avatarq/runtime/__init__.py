"""avatarq.runtime"""
