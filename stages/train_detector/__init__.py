"""The train_detector stage, a package: a Faster R-CNN (torchvision's, or detectron2's where it is
installed: ``detector.backend``) trained with Ray Train on the labeled images, with boxes taken
from the connected components of each class in the ground-truth masks.

``config`` (the settings and builder arguments), ``boxes`` (targets from masks), ``step`` (the
learner and its step, Ray-free), ``loop`` (the Ray Train worker) and ``stage`` (``run``)."""
