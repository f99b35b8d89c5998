//! Hugging Face hub downloads into the HF cache layout. Being written.
