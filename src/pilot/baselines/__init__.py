"""The baselines PILOT is compared with that need training or tuning, all on PILOT's protocol (the
same training rows, steps, batch size, seed and best-validation-step rule):

- :mod:`.lora`: LoRA at the hyper-network's parameter budget (peft);
- :mod:`.reft`: LoReFT interventions on hidden states, rank matched to the budget;
- :mod:`.soft_prompts`: pause tokens after every prompt, and soft thoughts (an assistant reads the
  prompt, a projection sized to the budget turns its states into soft tokens before it);
  :mod:`.soft_tokens` puts soft tokens in a prompt (placeholders the trained module embeds), which
  the one generation path takes;
- :mod:`.caa`: the static steering vector and its validation-chosen scale.

:mod:`.modules` saves the trained parts of ReFT and the soft prompts (safetensors + JSON).
Zero-shot and plan-in-context are the student answering without and with a plan
(:mod:`pilot.evaluation`).
"""
