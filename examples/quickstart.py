"""Adapt a small Llama-shaped model with LoRA, train a few steps with LoRA+, save, reload, merge."""

from __future__ import annotations

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(config)
    lorakit.adapt(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    print(lorakit.trainable_parameters(model))

    optimizer = lorakit.create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-3, loraplus_lr_ratio=16)
    batch = torch.randint(0, 256, (4, 32))
    model.train()
    for step in range(20):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == 19:
            print(f"step {step:2d}  loss {loss.item():.3f}")

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch).logits
    with tempfile.TemporaryDirectory() as directory:
        lorakit.save_adapter(model, directory)
        torch.manual_seed(0)
        reloaded = lorakit.load_adapter(LlamaForCausalLM(config), directory)
        with torch.no_grad():
            same = (reloaded(input_ids=batch).logits - logits).abs().max().item()
    print(f"saved and reloaded the adapter: max |Δlogit| = {same:.2e}")
    merged = lorakit.merge_and_unload(model)
    with torch.no_grad():
        diff = (merged(input_ids=batch).logits - logits).abs().max().item()
    print(f"merged into the base weights:   max |Δlogit| = {diff:.2e}")


if __name__ == "__main__":
    main()
