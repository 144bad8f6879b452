//! CLIP image preprocessing (to be written).
