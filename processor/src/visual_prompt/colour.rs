//! Mark colours: the original's named pool and `#rrggbb`.

use std::fmt;
use std::str::FromStr;

use super::VisualPromptError;

/// The original's colour pool (`color_pool`), CSS values.
pub const COLOUR_POOL: [(&str, Colour); 9] = [
    ("red", Colour::new(255, 0, 0)),
    ("lime", Colour::new(0, 255, 0)),
    ("blue", Colour::new(0, 0, 255)),
    ("yellow", Colour::new(255, 255, 0)),
    ("fuchsia", Colour::new(255, 0, 255)),
    ("aqua", Colour::new(0, 255, 255)),
    ("orange", Colour::new(255, 165, 0)),
    ("purple", Colour::new(128, 0, 128)),
    ("gold", Colour::new(255, 215, 0)),
];

/// An opaque RGB colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Colour {
    /// Red.
    pub r: u8,
    /// Green.
    pub g: u8,
    /// Blue.
    pub b: u8,
}

impl Colour {
    /// Red, the CLI default.
    pub const RED: Colour = Colour::new(255, 0, 0);

    /// A colour from its components.
    pub const fn new(r: u8, g: u8, b: u8) -> Self {
        Self { r, g, b }
    }

    /// Parse a pool name (`red`, `lime`, ..., case-insensitive) or `#rrggbb`.
    pub fn parse(s: &str) -> Result<Self, VisualPromptError> {
        let t = s.trim();
        if let Some(hex) = t.strip_prefix('#') {
            if hex.len() == 6 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                let byte = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16);
                if let (Ok(r), Ok(g), Ok(b)) = (byte(0), byte(2), byte(4)) {
                    return Ok(Self::new(r, g, b));
                }
            }
            return Err(VisualPromptError::UnknownColour(s.to_string()));
        }
        COLOUR_POOL
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(t))
            .map(|&(_, c)| c)
            .ok_or_else(|| VisualPromptError::UnknownColour(s.to_string()))
    }

    /// The pool name of this colour (`"red"`), if it is one; for "the red rectangle".
    pub fn name(&self) -> Option<&'static str> {
        COLOUR_POOL.iter().find(|(_, c)| c == self).map(|&(n, _)| n)
    }
}

impl FromStr for Colour {
    type Err = VisualPromptError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Colour {
    /// The pool name, or `#rrggbb`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "#{:02x}{:02x}{:02x}", self.r, self.g, self.b),
        }
    }
}
