//! A page's replica set (the memory nodes that hold its current version) and
//! how a memory node is named on the command line (`ADDR[,zone=NAME]`).

/// Most copies of a page (`vmm run --replicas`).
pub const MAX_REPLICAS: usize = 4;
/// A slot of a [`Replicas`] that names no node.
const NO_NODE: u8 = u8::MAX;

/// Up to [`MAX_REPLICAS`] node indexes packed in a `u32` (one byte each, the
/// members first, the rest [`NO_NODE`]), so that a page's whole set is read
/// and replaced with one atomic operation. The first member is the primary:
/// reads go there first.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Replicas(u32);

impl Replicas {
    /// No node: the page was never written out.
    pub const EMPTY: Replicas = Replicas(u32::MAX);

    /// The set stored as `bits`.
    pub fn from_bits(bits: u32) -> Self {
        Replicas(bits)
    }

    /// The set as stored.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// The set of the one node `i`.
    pub fn one(i: usize) -> Self {
        Self::EMPTY.with(i)
    }

    /// The members, primary first.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..MAX_REPLICAS)
            .map(move |k| (self.0 >> (8 * k)) as u8)
            .take_while(|&b| b != NO_NODE)
            .map(usize::from)
    }

    /// Members.
    pub fn len(self) -> usize {
        self.iter().count()
    }

    /// True if it has no member.
    pub fn is_empty(self) -> bool {
        self == Self::EMPTY
    }

    /// True if node `i` is a member.
    pub fn contains(self, i: usize) -> bool {
        self.iter().any(|m| m == i)
    }

    /// The first member.
    pub fn primary(self) -> Option<usize> {
        self.iter().next()
    }

    /// The set with node `i` added last (unchanged if it is a member or the
    /// set is full).
    pub fn with(self, i: usize) -> Self {
        debug_assert!(i < NO_NODE as usize);
        let n = self.len();
        if n == MAX_REPLICAS || self.contains(i) {
            return self;
        }
        let shift = 8 * n;
        Replicas((self.0 & !(0xff << shift)) | ((i as u32) << shift))
    }

    /// The members for which `keep` is true, in order.
    pub fn filter(self, mut keep: impl FnMut(usize) -> bool) -> Self {
        self.iter().filter(|&i| keep(i)).collect()
    }

    /// The set without node `i`.
    pub fn without(self, i: usize) -> Self {
        self.filter(|m| m != i)
    }
}

impl FromIterator<usize> for Replicas {
    fn from_iter<T: IntoIterator<Item = usize>>(iter: T) -> Self {
        iter.into_iter().fold(Self::EMPTY, Self::with)
    }
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// A memory node as `--memnode` names it: its address and, optionally, its
/// failure domain (`ADDR,zone=NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Where it listens.
    pub addr: String,
    /// Its failure domain; a page's copies go to distinct zones whenever
    /// enough zones have room.
    pub zone: Option<String>,
}

/// Why a `--memnode` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeSpecError {
    /// No address before the options.
    #[error("memory node {0:?}: the address is missing (ADDR[,zone=NAME])")]
    NoAddr(String),
    /// An option other than `zone=`.
    #[error("memory node {spec:?}: unknown option {option:?} (only zone=NAME)")]
    Option {
        /// The whole value.
        spec: String,
        /// The option.
        option: String,
    },
    /// A zone name that is empty, too long or not `[A-Za-z0-9._-]`.
    #[error("memory node {0:?}: a zone is 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    Zone(String),
}

impl std::str::FromStr for NodeSpec {
    type Err = NodeSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let addr = parts.next().unwrap_or_default().trim();
        if addr.is_empty() {
            return Err(NodeSpecError::NoAddr(s.into()));
        }
        let mut zone = None;
        for opt in parts {
            match opt.trim().split_once('=') {
                Some(("zone", z)) => {
                    let ok = (1..=64).contains(&z.len())
                        && z.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                    if !ok {
                        return Err(NodeSpecError::Zone(s.into()));
                    }
                    zone = Some(z.to_string());
                }
                _ => {
                    return Err(NodeSpecError::Option {
                        spec: s.into(),
                        option: opt.into(),
                    });
                }
            }
        }
        Ok(NodeSpec {
            addr: addr.into(),
            zone,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_keep_order_and_distinct_members() {
        let s: Replicas = [3, 1, 3, 7].into_iter().collect();
        assert_eq!(s.iter().collect::<Vec<_>>(), [3, 1, 7]);
        assert_eq!(s.primary(), Some(3));
        assert_eq!(s.without(3).iter().collect::<Vec<_>>(), [1, 7]);
        assert_eq!(s.without(1).iter().collect::<Vec<_>>(), [3, 7]);
        assert!(s.contains(7) && !s.contains(0));
        assert_eq!(s.with(9).with(10).len(), MAX_REPLICAS);
        assert!(Replicas::EMPTY.is_empty() && Replicas::EMPTY.primary().is_none());
        assert_eq!(Replicas::one(253).iter().collect::<Vec<_>>(), [253]);
        assert_eq!(Replicas::from_bits(s.bits()), s);
        assert!(s.filter(|_| false).is_empty());
    }

    #[test]
    fn node_specs_parse_with_clear_errors() {
        let n: NodeSpec = "10.0.0.2:7000,zone=rack-1".parse().unwrap();
        assert_eq!(n.addr, "10.0.0.2:7000");
        assert_eq!(n.zone.as_deref(), Some("rack-1"));
        assert_eq!("h:1".parse::<NodeSpec>().unwrap().zone, None);
        let e = "h:1,zone=".parse::<NodeSpec>().unwrap_err();
        assert!(e.to_string().contains("a zone is 1 to 64"), "{e}");
        let e = "h:1,rack=2".parse::<NodeSpec>().unwrap_err();
        assert!(e.to_string().contains("unknown option \"rack=2\""), "{e}");
        assert!(matches!(
            ",zone=a".parse::<NodeSpec>(),
            Err(NodeSpecError::NoAddr(_))
        ));
    }
}
