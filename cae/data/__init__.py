"""The images: built-in torchvision sets and the embedded sample, the user's folders and
array files (probed, decoded and cached), and the splits a trial trains on."""
