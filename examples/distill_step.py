"""A few steps of knowledge distillation with fasttl's fused loss: a small student learns from a
fixed random teacher's softened outputs plus the hard labels."""
import torch

import fasttl

torch.manual_seed(0)
features, classes = 32, 10
teacher = torch.nn.Linear(features, classes)
student = torch.nn.Sequential(torch.nn.Linear(features, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes))
criterion = fasttl.nn.DistillationLoss(temperature=4.0, alpha=0.9)
optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)

x = torch.randn(512, features)
with torch.no_grad():
    teacher_logits = teacher(x)
labels = teacher_logits.argmax(1)
for step in range(101):
    loss = criterion(student(x), teacher_logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 25 == 0:
        agreement = (student(x).argmax(1) == labels).float().mean().item()
        print(f"step {step:3d}  loss {loss.item():.4f}  agreement with teacher {agreement:.2%}")
