//! rdrop-data (work in progress).
