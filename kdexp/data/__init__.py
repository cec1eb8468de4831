"""Datasets as in-memory tensors (kdexp.data.core), the built-in datasets registered by name
(digits, npz, fake, torchvision's, imagefolder, custom), domain shifts (kdexp.data.domain) and replayable random
augmentation (kdexp.data.augment)."""
from kdexp.data.core import (DATASETS, Data, Signature, as_images, as_images_shape, check_classes,  # noqa: F401
                             dataset_signature, in_memory_choice, labeled_mask, list_datasets, load_dataset, register_dataset,
                             stratified_split)
from kdexp.data.sanity import DataContentError  # noqa: F401
from kdexp.data import builtin, custom, fake, folder, vision  # noqa: E402,F401  (register the datasets)
