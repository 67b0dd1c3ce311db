"""Evaluation of trained checkpoints: loading them (checkpoint), loss by position bucket
(positional_loss), passkey retrieval (needle), block-selection maps (block_selection), power-law
fits (scaling_fit) and the scaling sweep (sweep).
"""
