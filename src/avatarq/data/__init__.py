"""avatarq.data"""
