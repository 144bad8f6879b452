//! What LoRA adapts: `--lora-targets` as a typed list.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A LoRA target: one of the language model's projections, or a group of them.
///
/// Written and parsed as the names `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
/// `up_proj`, `down_proj` and the groups `attn` (also `attention`), `mlp` and `all`; saved
/// configs hold the same names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum LoraTarget {
    /// `self_attn.q_proj`.
    QProj,
    /// `self_attn.k_proj`.
    KProj,
    /// `self_attn.v_proj`.
    VProj,
    /// `self_attn.o_proj`.
    OProj,
    /// `mlp.gate_proj`.
    GateProj,
    /// `mlp.up_proj`.
    UpProj,
    /// `mlp.down_proj`.
    DownProj,
    /// The four attention projections (`attn` or `attention`).
    Attn,
    /// The three MLP projections.
    Mlp,
    /// Every projection.
    All,
}

/// `--lora-targets` names no known target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown LoRA target `{0}` (attn, mlp, all, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
)]
pub struct UnknownLoraTarget(pub String);

impl LoraTarget {
    /// The attention projections.
    pub const ATTENTION: [LoraTarget; 4] = [Self::QProj, Self::KProj, Self::VProj, Self::OProj];
    /// The MLP projections.
    pub const MLP: [LoraTarget; 3] = [Self::GateProj, Self::UpProj, Self::DownProj];
    /// Every projection, attention first.
    pub const PROJECTIONS: [LoraTarget; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    /// The name as written on the command line and in saved configs.
    pub fn name(self) -> &'static str {
        match self {
            Self::QProj => "q_proj",
            Self::KProj => "k_proj",
            Self::VProj => "v_proj",
            Self::OProj => "o_proj",
            Self::GateProj => "gate_proj",
            Self::UpProj => "up_proj",
            Self::DownProj => "down_proj",
            Self::Attn => "attn",
            Self::Mlp => "mlp",
            Self::All => "all",
        }
    }

    /// The single projections this target stands for.
    pub fn projections(self) -> &'static [LoraTarget] {
        match self {
            Self::Attn => &Self::ATTENTION,
            Self::Mlp => &Self::MLP,
            Self::All => &Self::PROJECTIONS,
            Self::QProj => &[Self::QProj],
            Self::KProj => &[Self::KProj],
            Self::VProj => &[Self::VProj],
            Self::OProj => &[Self::OProj],
            Self::GateProj => &[Self::GateProj],
            Self::UpProj => &[Self::UpProj],
            Self::DownProj => &[Self::DownProj],
        }
    }

    /// True for the projections of the attention block (`self_attn.*`).
    pub fn is_attention(self) -> bool {
        Self::ATTENTION.contains(&self)
    }
}

impl FromStr for LoraTarget {
    type Err = UnknownLoraTarget;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "attention" {
            return Ok(Self::Attn);
        }
        [Self::Attn, Self::Mlp, Self::All]
            .into_iter()
            .chain(Self::PROJECTIONS)
            .find(|t| t.name() == s)
            .ok_or_else(|| UnknownLoraTarget(s.to_string()))
    }
}

impl fmt::Display for LoraTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<LoraTarget> for String {
    fn from(t: LoraTarget) -> Self {
        t.name().to_string()
    }
}

impl TryFrom<String> for LoraTarget {
    type Error = UnknownLoraTarget;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_groups_expand() {
        for t in [LoraTarget::Attn, LoraTarget::Mlp, LoraTarget::All]
            .into_iter()
            .chain(LoraTarget::PROJECTIONS)
        {
            assert_eq!(t.to_string().parse::<LoraTarget>().unwrap(), t);
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{t}\""));
            assert_eq!(serde_json::from_str::<LoraTarget>(&json).unwrap(), t);
        }
        assert_eq!(" attention ".parse::<LoraTarget>().unwrap(), LoraTarget::Attn);
        assert_eq!(LoraTarget::Attn.projections().len(), 4);
        assert_eq!(LoraTarget::All.projections().len(), 7);
        assert!(LoraTarget::VProj.is_attention() && !LoraTarget::UpProj.is_attention());
        let e = "qproj".parse::<LoraTarget>().unwrap_err().to_string();
        assert!(
            e.contains("unknown LoRA target `qproj`") && e.contains("down_proj"),
            "{e}"
        );
        assert!(serde_json::from_str::<LoraTarget>("\"nope\"").is_err());
    }
}
