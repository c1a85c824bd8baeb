//! rdrop-vit (work in progress).
