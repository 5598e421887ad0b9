"""avatarq.calibration"""
