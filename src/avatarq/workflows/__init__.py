"""avatarq.workflows: orchestration above every stage (the demo, the calibration-peer
study, fleet export). Nothing in the stages imports it."""
