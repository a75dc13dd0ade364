//! Training loop shared by the pretrain, sft and align stages (see issue 5).
