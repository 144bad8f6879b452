//! What a forward pass refuses: inputs that do not fit the model.

/// Errors of a forward pass caused by its inputs.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ForwardError {
    /// The number of `<image>` token positions differs from the number of image features.
    #[error(
        "Image features and image tokens do not match: tokens: {tokens}, features: {features} ({images} image(s) x {per_image} features each)"
    )]
    ImageTokenMismatch {
        /// Positions holding the image token.
        tokens: usize,
        /// Image feature vectors available.
        features: usize,
        /// Images given.
        images: usize,
        /// Features per image.
        per_image: usize,
    },
    /// Pixel values of the wrong shape.
    #[error("pixel_values must be [batch, {channels}, {size}, {size}], found {found:?}")]
    PixelShape {
        /// Expected channels.
        channels: usize,
        /// Expected side.
        size: usize,
        /// Found shape.
        found: Vec<usize>,
    },
    /// A token id outside the vocabulary.
    #[error("token id {id} at position {position} is outside the vocabulary (vocab_size {vocab_size})")]
    TokenOutOfVocab {
        /// The id.
        id: i64,
        /// Flat position.
        position: usize,
        /// Vocabulary size.
        vocab_size: usize,
    },
    /// Position ids / mask do not match the input.
    #[error("invalid forward inputs: {0}")]
    BadInput(String),
}
