"""avatarq.render"""
