"""Distil TEACHER into STUDENT (same tokenizer) on a text file inside a transformers Trainer, with alignkd's terms."""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from alignkd.integrations import DistillTrainer

teacher_path, student_path, text_file, out, *steps = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(teacher_path)
teacher = AutoModelForCausalLM.from_pretrained(teacher_path)
student = AutoModelForCausalLM.from_pretrained(student_path)
with open(text_file, encoding="utf-8") as f:
    rows = [tokenizer(line.strip(), truncation=True, max_length=256) for line in f if line.strip()]
losses = [{"type": "kl", "temperature": 2.0}, {"type": "hidden", "projector": "linear"}, {"type": "ce", "weight": 0.5}]
args = TrainingArguments(out, max_steps=int(steps[0]) if steps else 200, per_device_train_batch_size=8, report_to=[])
trainer = DistillTrainer(student, args, teacher=teacher, losses=losses, train_dataset=rows, processing_class=tokenizer)
trainer.train()
trainer.save_model(out)  # the student in Hugging Face format, and alignkd_side.pt (the projectors)
