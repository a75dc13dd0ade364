//! Model core shared by training, evaluation and export stages (see issue 4).
