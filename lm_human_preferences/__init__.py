"""lm-human-preferences: reward models from human preference labels and PPO fine-tuning of GPT-2.

A rebuild of the system behind Ziegler et al. (2019), *Fine-Tuning Language Models from Human
Preferences*, on current TensorFlow in TF1 graph style. See ARCHITECTURE.md for the layout.
"""
