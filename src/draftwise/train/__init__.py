"""Training speculation heads by self-distillation (`draftwise train {eagle,medusa}`).

`data` answers the training prompts with the target and stores its hidden states,
`dataset` reads them back as batches, `loop` is the shared optimizer loop with
checkpoints and resume, and `eagle` / `medusa` hold each head's objective and saving.
"""
