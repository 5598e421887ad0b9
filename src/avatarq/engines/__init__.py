"""avatarq.engines"""
