"""avatarq.export"""
