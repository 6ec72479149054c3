"""The baselines PILOT is compared with that need training or tuning: LoRA (:mod:`.lora`) and
the CAA steering vector (:mod:`.caa`). Zero-shot and plan-in-context are the student answering
without and with a plan (:mod:`pilot.evaluation`)."""
