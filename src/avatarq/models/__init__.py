"""avatarq.models"""
