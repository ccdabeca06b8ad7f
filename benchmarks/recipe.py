"""The users' notebook recipe, for benchmark scenario 1: HF Trainer with HF's defaults.

    python benchmarks/recipe.py CONFIG OUTPUT_DIR [--padding max_length|dynamic] [--group-by-length]
                                [--batch-size 8] [--set key=value ...]

What the notebooks do: tokenise every text with ``padding="max_length", max_length=512``, then
``Trainer`` with ``TrainingArguments`` left at their defaults (learning rate 5e-5, batch 8, no
warmup, no weight decay, the model of the last epoch). The same data split as peftlab (its own
``prepare_data`` on the same config and seed) and the same test metrics, so only the recipe differs.

``--padding dynamic`` and ``--group-by-length`` switch on one of peftlab's defaults at a time, so the
benchmark can say what each one is worth. Prints one JSON line: samples/s, steps, wall time, peak RSS
(``peftlab.train.PeakMemory``, sampled every 50 ms as in peftlab's runs) and test metrics.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("output_dir")
    parser.add_argument("--padding", choices=["max_length", "dynamic"], default="max_length")
    parser.add_argument("--group-by-length", action="store_true")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    import datasets
    import torch
    import transformers
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    from peftlab.config import load_config
    from peftlab.data import prepare_data
    from peftlab.evaluate import classification_metrics
    from peftlab.models import resolve_model_path
    from peftlab.train import PeakMemory

    transformers.utils.logging.set_verbosity_error()
    config = load_config(args.config, args.overrides)
    set_seed(config.training.seed)
    data = prepare_data(config.data)
    folder = str(resolve_model_path(config.model.path))
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def encode(split):
        if args.padding == "max_length":
            encoded = tokenizer(split.texts, padding="max_length", max_length=512, truncation=True)
        else:  # peftlab's way: no padding here, the collator pads each batch to its longest text
            encoded = tokenizer(split.texts, truncation=True, max_length=512)
        return datasets.Dataset.from_dict({**{key: encoded[key] for key in encoded}, "labels": split.labels})

    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(data.labels))
    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=config.training.epochs, per_device_train_batch_size=args.batch_size,
        eval_strategy="epoch", save_strategy="no", report_to="none", seed=config.training.seed,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=encode(data.train),
                      eval_dataset=encode(data.validation),
                      data_collator=DataCollatorWithPadding(tokenizer) if args.padding == "dynamic" else None)

    with PeakMemory() as memory:  # the sampler peftlab's own runs use, so both sides are measured alike
        output = trainer.train()
    prediction = trainer.predict(encode(data.test))
    # label_ids, not the split's order: group_by_length reorders evaluation rows too (transformers 5.x)
    metrics = classification_metrics(np.asarray(prediction.label_ids), prediction.predictions.argmax(-1),
                                     len(data.labels))
    print(json.dumps({"train_samples_per_s": output.metrics["train_samples_per_second"],
                      "wall_time_s": output.metrics["train_runtime"], "train_steps": trainer.state.global_step,
                      "peak_rss_bytes": memory.peak, "test_metrics": metrics}))


if __name__ == "__main__":
    main()
