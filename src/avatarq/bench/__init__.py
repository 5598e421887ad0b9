"""avatarq.bench"""
