"""The LoRA trainer for a GGUF model: run only as its own process (``slm_app.finetune.jobs`` starts it
with ``nice`` and a thread limit), so the serving process never imports torch.

    python -m slm_app.finetune.train_llama CONFIG.json

transformers loads the served GGUF dequantized to float32 (``from_pretrained(dir, gguf_file=...)``),
peft wraps it in a rank-``r`` LoRA on every attention and MLP projection, and a plain AdamW loop
trains the LoRA weights only. The examples arrive already tokenized by the serving model's own
tokenizer (llama.cpp, chat template applied): ``{"ids": [...], "start": k}`` per line, the loss on
``ids[k:]`` only (the answer and its end-of-turn token), so what is learnt is exactly what the served
model will see.

Progress goes to stdout, one JSON object a line (``{"event": "progress", "step", "total_steps",
"epoch", "loss", "val_loss", "eta_s", ...}``), the result last (``{"event": "done", ...}``). Output:
the peft adapter (``adapter_model.safetensors``, ``adapter_config.json``) and the base model's
``config.json`` in ``out_dir``, which is what ``convert_lora_to_gguf.py --base`` reads.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from slm_app.finetune.training import batches, done, emit, examples, run_epochs, run_main, total_steps

# LoRA targets of the llama and gemma3 architectures in transformers (both name them alike).
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The architectures transformers can load from a GGUF (its model_type: a Gemma 3 GGUF loads as
# gemma3_text) and the class name llama.cpp's converter maps back to a GGUF architecture.
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def collate(batch: list[dict[str, Any]], torch: Any) -> tuple[Any, Any, Any]:
    """Right-padded ids, attention mask, labels (-100 on the prompt and the padding)."""
    width = max(len(e["ids"]) for e in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e["ids"])
        ids[row, :n] = torch.tensor(e["ids"])
        mask[row, :n] = 1
        labels[row, e["start"]:n] = torch.tensor(e["ids"][e["start"]:])
    return ids, mask, labels


def main(config_path: str) -> int:
    cfg = json.loads(Path(config_path).read_text(encoding="utf-8"))
    threads = int(cfg.get("threads", 1))
    t_start = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cancelled: end now, write nothing more

    import torch
    import transformers
    import peft

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(int(cfg.get("seed", 0)))
    gguf = Path(cfg["gguf_path"])
    emit("status", message=f"loading {gguf.name} (dequantizing to float32)")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              torch_dtype=torch.float32)
    arch = model.config.model_type
    if arch not in SUPPORTED_ARCHITECTURES:
        emit("error", message=f"architecture {arch!r} is not supported for LoRA training "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        return 3
    lora = peft.LoraConfig(r=int(cfg.get("rank", 8)), lora_alpha=int(cfg.get("alpha", 16)),
                           lora_dropout=float(cfg.get("dropout", 0.0)), target_modules=TARGET_MODULES,
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    load_s = time.perf_counter() - t_start
    if (data := examples(cfg, trainable, t_start)) is None:
        return 2
    train, val = data
    epochs, batch_size = int(cfg.get("epochs", 3)), int(cfg.get("batch_size", 4))
    total = total_steps(len(train), batch_size, epochs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=float(cfg.get("learning_rate", 1e-3)), weight_decay=0.0)
    # Linear warm-down to 10%: a few dozen steps, no warm-up needed for a zero-initialised LoRA B.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.9 * s / max(total, 1))

    def validation_loss() -> float | None:
        if not val:
            return None
        model.eval()
        total_loss, count = 0.0, 0
        with torch.no_grad():
            for b in batches(val, batch_size, None):
                ids, mask, labels = collate(b, torch)
                n = int((labels[:, 1:] != -100).sum())
                total_loss += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
                count += n
        model.train()
        return total_loss / max(count, 1)

    def step(b: list[dict[str, Any]]) -> float:
        ids, mask, labels = collate(b, torch)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    model.train()
    result = run_epochs(train, epochs, batch_size, int(cfg.get("seed", 0)), step, validation_loss, t_start)

    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    # convert_lora_to_gguf.py --base reads only config.json, and needs "architectures" in it.
    base_config = model.base_model.model.config.to_dict()
    base_config["architectures"] = [SUPPORTED_ARCHITECTURES[arch]]
    (out / "config.json").write_text(json.dumps(base_config, indent=2, default=str), encoding="utf-8")
    done(result, train, val, trainable, load_s, threads, epochs=epochs,
         versions={"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__})
    return 0


if __name__ == "__main__":
    run_main(main, "slm_app.finetune.train_llama")
