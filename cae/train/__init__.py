"""Training without Ray: tasks (a batch -> input and target), one model's loop (``Trainer``)
and a pack of models trained side by side (``Pack``), sharing their rules."""
