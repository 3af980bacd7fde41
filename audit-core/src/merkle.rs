//! Merkle trees over record hashes, as certificate transparency builds them (RFC 6962
//! section 2.1, verification as RFC 9162 section 2.1.3.2 and 2.1.4.2 give it): a leaf
//! is `SHA-256(0x00 || data)`, a node `SHA-256(0x01 || left || right)`, a tree of n
//! leaves splits at the largest power of two below n. An inclusion proof shows that one
//! record is in a tree whose head was signed; a consistency proof shows that a later
//! tree extends an earlier one without rewriting it. Both are checked with hashes alone.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// Subtree heads by the leaves `[a, b)` they cover.
pub type Heads = std::collections::HashMap<(u64, u64), Hash>;

/// The hash of a leaf holding `data`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// The hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two smaller than `n` (n >= 2).
fn split(n: u64) -> u64 {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// The tree head over `leaves` (leaf hashes, in order); the empty tree's is SHA-256 of
/// nothing.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n as u64) as usize;
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The subtrees (leaf ranges `[a, b)`) whose heads make up the inclusion proof of leaf
/// `index` in a tree of `size` leaves (RFC 6962 `PATH`), nearest first; `None` past
/// the last leaf.
pub fn inclusion_ranges(index: u64, size: u64) -> Option<Vec<(u64, u64)>> {
    fn path(m: u64, lo: u64, hi: u64, out: &mut Vec<(u64, u64)>) {
        if hi - lo <= 1 {
            return;
        }
        let k = split(hi - lo);
        if m < k {
            path(m, lo, lo + k, out);
            out.push((lo + k, hi));
        } else {
            path(m - k, lo + k, hi, out);
            out.push((lo, lo + k));
        }
    }
    if index >= size {
        return None;
    }
    let mut out = Vec::new();
    path(index, 0, size, &mut out);
    Some(out)
}

/// The subtrees whose heads make up the proof that the tree of `first` leaves is a
/// prefix of the tree of `size` (RFC 6962 `PROOF`); `None` unless `0 < first <= size`.
pub fn consistency_ranges(first: u64, size: u64) -> Option<Vec<(u64, u64)>> {
    fn sub(m: u64, lo: u64, hi: u64, whole: bool, out: &mut Vec<(u64, u64)>) {
        let n = hi - lo;
        if m == n {
            if !whole {
                out.push((lo, hi));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            sub(m, lo, lo + k, whole, out);
            out.push((lo + k, hi));
        } else {
            sub(m - k, lo + k, hi, false, out);
            out.push((lo, lo + k));
        }
    }
    if first == 0 || first > size {
        return None;
    }
    let mut out = Vec::new();
    sub(first, 0, size, true, &mut out);
    Some(out)
}

/// The inclusion proof of leaf `index` in the tree over `leaves`, or `None` past the
/// last leaf.
pub fn inclusion_proof(index: usize, leaves: &[Hash]) -> Option<Vec<Hash>> {
    let ranges = inclusion_ranges(index as u64, leaves.len() as u64)?;
    Some(
        ranges
            .into_iter()
            .map(|(a, b)| root(&leaves[a as usize..b as usize]))
            .collect(),
    )
}

/// Whether `proof` shows `leaf` at `index` in the tree of `size` leaves whose head is
/// `head`.
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], head: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *head
}

/// The proof that the tree over the first `first` of `leaves` is a prefix of the tree
/// over all of them, or `None` unless `0 < first <= leaves.len()`.
pub fn consistency_proof(first: usize, leaves: &[Hash]) -> Option<Vec<Hash>> {
    let ranges = consistency_ranges(first as u64, leaves.len() as u64)?;
    Some(
        ranges
            .into_iter()
            .map(|(a, b)| root(&leaves[a as usize..b as usize]))
            .collect(),
    )
}

/// Whether `proof` shows that the tree of `first` leaves with head `first_head` is a
/// prefix of the tree of `second` leaves with head `second_head`.
pub fn verify_consistency(
    first: u64,
    second: u64,
    proof: &[Hash],
    first_head: &Hash,
    second_head: &Hash,
) -> bool {
    if first == 0 || first > second {
        return false;
    }
    if first == second {
        return proof.is_empty() && first_head == second_head;
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_head);
    }
    path.extend_from_slice(proof);
    let Some((start, rest)) = path.split_first() else {
        return false;
    };
    let (mut f, mut s) = (first - 1, second - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (*start, *start);
    for c in rest {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    fr == *first_head && sr == *second_head && s == 0
}

/// A compact range: the heads of the perfect subtrees that cover leaves `[begin, end)`,
/// in order, each as large as its alignment allows. From `0`, it is what a tree needs to
/// grow (the "frontier") and gives the tree head; ranges that meet can be joined.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Range {
    begin: u64,
    end: u64,
    /// (level, head): a node at level `l` covers `2^l` leaves.
    nodes: Vec<(u32, Hash)>,
}

impl Range {
    /// The empty range at `begin`.
    pub fn new(begin: u64) -> Self {
        Self {
            begin,
            end: begin,
            nodes: Vec::new(),
        }
    }

    /// The range `[0, size)` from its node heads, largest first (as [`Range::frontier`]
    /// gives them); `None` when their number does not fit `size`.
    pub fn from_frontier(size: u64, heads: &[Hash]) -> Option<Self> {
        let levels: Vec<u32> = (0..64).rev().filter(|l| size >> l & 1 == 1).collect();
        (levels.len() == heads.len()).then(|| Self {
            begin: 0,
            end: size,
            nodes: levels.into_iter().zip(heads.iter().copied()).collect(),
        })
    }

    pub fn begin(&self) -> u64 {
        self.begin
    }

    pub fn end(&self) -> u64 {
        self.end
    }

    /// The node heads, largest first.
    pub fn frontier(&self) -> Vec<Hash> {
        self.nodes.iter().map(|(_, h)| *h).collect()
    }

    /// Each node with the leaves it covers.
    fn spans(&self) -> impl Iterator<Item = (u64, u64, &Hash)> {
        let mut at = self.begin;
        self.nodes.iter().map(move |(l, h)| {
            let start = at;
            at += 1 << l;
            (start, at, h)
        })
    }

    /// Appends one leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        self.push_node(0, leaf, &mut |_, _, _| {});
    }

    /// Appends a node of `level` at the end (which must be aligned to it), merging
    /// siblings; `made` sees every node formed, the appended one included.
    fn push_node(&mut self, level: u32, head: Hash, made: &mut impl FnMut(u64, u64, &Hash)) {
        let start = self.end;
        self.end += 1 << level;
        made(start, self.end, &head);
        self.nodes.push((level, head));
        while let [.., (l1, left), (l2, right)] = self.nodes[..] {
            let left_start = self.end - (1 << l2) - (1 << l1);
            if l1 != l2 || left_start < self.begin || (left_start >> l1) & 1 == 1 {
                break;
            }
            let up = node_hash(&left, &right);
            self.nodes.truncate(self.nodes.len() - 2);
            self.nodes.push((l1 + 1, up));
            made(left_start, self.end, &up);
        }
    }

    /// Appends the range that starts where this one ends; `false` (and unchanged) when
    /// they do not meet.
    pub fn extend(&mut self, other: &Range) -> bool {
        if other.begin != self.end {
            return false;
        }
        for (l, h) in &other.nodes {
            self.push_node(*l, *h, &mut |_, _, _| {});
        }
        true
    }

    /// The tree head over `[0, end)`; `None` for a range that does not start at 0.
    pub fn root(&self) -> Option<Hash> {
        if self.begin != 0 {
            return None;
        }
        Some(fold(self.nodes.iter().map(|(_, h)| h)))
    }
}

/// The head of consecutive perfect subtrees, largest first: folded from the right, as
/// RFC 6962 builds a tree whose size is not a power of two.
fn fold<'a>(heads: impl DoubleEndedIterator<Item = &'a Hash>) -> Hash {
    let mut it = heads.rev();
    match it.next() {
        None => Sha256::digest([]).into(),
        Some(last) => it.fold(*last, |acc, h| node_hash(h, &acc)),
    }
}

/// Proofs computed in one pass over the leaves, holding only the subtree heads they
/// need: the leaves are pushed in order from where `start` ends (a frontier taken from
/// a seal, or the empty range) up to `size`.
pub struct Prover {
    size: u64,
    range: Range,
    /// Wanted subtrees and their heads once seen.
    wanted: std::collections::HashMap<(u64, u64), Option<Hash>>,
}

impl Prover {
    /// A prover for the subtrees `wanted` (from [`inclusion_ranges`] and
    /// [`consistency_ranges`]) of the tree of `size` leaves, starting from `start`
    /// (which must begin at 0).
    pub fn new(size: u64, wanted: impl IntoIterator<Item = (u64, u64)>, start: Range) -> Self {
        let mut wanted: std::collections::HashMap<_, _> =
            wanted.into_iter().map(|r| (r, None)).collect();
        for (a, b, h) in start.spans() {
            if let Some(slot) = wanted.get_mut(&(a, b)) {
                *slot = Some(*h);
            }
        }
        Self {
            size,
            range: start,
            wanted,
        }
    }

    /// Where the next leaf goes.
    pub fn position(&self) -> u64 {
        self.range.end
    }

    /// Whether every leaf up to the tree's size has been pushed.
    pub fn is_full(&self) -> bool {
        self.range.end >= self.size
    }

    /// Pushes the next leaf (ignored past the tree's size).
    pub fn push(&mut self, leaf: Hash) {
        if self.is_full() {
            return;
        }
        let wanted = &mut self.wanted;
        self.range.push_node(0, leaf, &mut |a, b, h| {
            if let Some(slot) = wanted.get_mut(&(a, b)) {
                *slot = Some(*h);
            }
        });
    }

    /// The heads of the wanted subtrees, and the tree's head; `Err` names a subtree that
    /// could not be computed from what was pushed (it lies before the start, or leaves
    /// are missing).
    pub fn finish(self) -> Result<(Heads, Hash), (u64, u64)> {
        if self.range.end != self.size {
            return Err((self.range.end, self.size));
        }
        let root = self.range.root().ok_or((0, self.size))?;
        // Subtrees on the right edge are not perfect: folded from the final nodes.
        let spans: Vec<(u64, u64, Hash)> = self.range.spans().map(|(a, b, h)| (a, b, *h)).collect();
        let mut out = Heads::with_capacity(self.wanted.len());
        for ((a, b), head) in self.wanted {
            let head = match head {
                Some(h) => h,
                None if b == self.size && spans.iter().any(|s| s.0 == a) => {
                    fold(spans.iter().filter(|s| s.0 >= a).map(|s| &s.2))
                }
                None => return Err((a, b)),
            };
            out.insert((a, b), head);
        }
        Ok((out, root))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inputs of the certificate transparency reference tests.
    const ENTRIES: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];
    /// Their tree heads for 0 to 8 leaves.
    const HEADS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    fn h(s: &str) -> Hash {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).unwrap();
        out
    }

    fn leaves() -> Vec<Hash> {
        ENTRIES
            .iter()
            .map(|e| leaf_hash(&hex::decode(e).unwrap()))
            .collect()
    }

    #[test]
    fn tree_heads_match_the_reference() {
        let l = leaves();
        for n in 0..=8 {
            assert_eq!(hex::encode(root(&l[..n])), HEADS[n], "{n} leaves");
        }
    }

    #[test]
    fn inclusion_proofs_match_the_reference_and_verify() {
        let l = leaves();
        // (leaf index, tree size, proof)
        let cases: [(usize, usize, &[&str]); 2] = [
            (
                0,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                8,
                &[
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
        ];
        for (i, n, want) in cases {
            let proof = inclusion_proof(i, &l[..n]).unwrap();
            let want: Vec<Hash> = want.iter().map(|w| h(w)).collect();
            assert_eq!(proof, want, "leaf {i} of {n}");
            assert!(verify_inclusion(
                i as u64,
                n as u64,
                &l[i],
                &proof,
                &h(HEADS[n])
            ));
            assert!(!verify_inclusion(
                i as u64,
                n as u64,
                &l[i],
                &proof,
                &h(HEADS[n - 1])
            ));
        }
        assert!(inclusion_proof(8, &l).is_none());
    }

    #[test]
    fn consistency_proofs_match_the_reference_and_verify() {
        let l = leaves();
        let cases: [(usize, usize, &[&str]); 4] = [
            (1, 1, &[]),
            (
                1,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                8,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                5,
                &[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (m, n, want) in cases {
            let proof = consistency_proof(m, &l[..n]).unwrap();
            let want: Vec<Hash> = want.iter().map(|w| h(w)).collect();
            assert_eq!(proof, want, "{m} -> {n}");
            let (a, b) = (h(HEADS[m]), h(HEADS[n]));
            assert!(verify_consistency(m as u64, n as u64, &proof, &a, &b));
            if m < n {
                assert!(!verify_consistency(m as u64, n as u64, &proof, &b, &a));
            }
        }
        assert!(consistency_proof(0, &l).is_none());
        assert!(consistency_proof(9, &l).is_none());
    }

    /// Every leaf of every tree up to 70 leaves proves, and nothing else does: a changed
    /// leaf, a wrong index, a cut proof, a rewritten prefix.
    #[test]
    fn every_shape_proves_and_forgeries_do_not() {
        let all: Vec<Hash> = (0u32..70).map(|i| leaf_hash(&i.to_le_bytes())).collect();
        for n in 1..=all.len() {
            let l = &all[..n];
            let head = root(l);
            for i in 0..n {
                let p = inclusion_proof(i, l).unwrap();
                assert!(verify_inclusion(i as u64, n as u64, &l[i], &p, &head));
                let other = leaf_hash(b"forged");
                assert!(!verify_inclusion(i as u64, n as u64, &other, &p, &head));
                if n > 1 {
                    let j = (i + 1) % n;
                    assert!(!verify_inclusion(j as u64, n as u64, &l[i], &p, &head));
                }
                if let Some((_, short)) = p.split_last() {
                    assert!(!verify_inclusion(i as u64, n as u64, &l[i], short, &head));
                }
            }
            for m in 1..=n {
                let p = consistency_proof(m, l).unwrap();
                let first = root(&l[..m]);
                assert!(
                    verify_consistency(m as u64, n as u64, &p, &first, &head),
                    "{m} -> {n}"
                );
                if m < n {
                    let mut rewritten = l[..m].to_vec();
                    rewritten[m - 1] = leaf_hash(b"rewritten");
                    assert!(
                        !verify_consistency(m as u64, n as u64, &p, &root(&rewritten), &head),
                        "{m} -> {n}"
                    );
                }
            }
        }
    }

    /// A range grown leaf by leaf, or joined from pieces, or rebuilt from its frontier,
    /// has the head of the tree over those leaves; a prover started from any frontier
    /// gives the proofs computed over all the leaves at once.
    #[test]
    fn ranges_and_the_prover_agree_with_the_whole_tree() {
        let all: Vec<Hash> = (0u32..40).map(|i| leaf_hash(&i.to_le_bytes())).collect();
        for n in 0..=all.len() {
            let l = &all[..n];
            let mut whole = Range::new(0);
            l.iter().for_each(|h| whole.push(*h));
            assert_eq!(whole.root(), Some(root(l)), "{n}");
            let again = Range::from_frontier(n as u64, &whole.frontier()).unwrap();
            assert_eq!(again, whole);
            let mut extra = whole.frontier();
            extra.push([0; 32]);
            assert!(Range::from_frontier(n as u64, &extra).is_none());
            for cut in 0..=n {
                let mut left = Range::new(0);
                l[..cut].iter().for_each(|h| left.push(*h));
                let mut right = Range::new(cut as u64);
                l[cut..].iter().for_each(|h| right.push(*h));
                assert!(!left.clone().extend(&Range::new(cut as u64 + 1)));
                assert!(left.extend(&right));
                assert_eq!(left.root(), Some(root(l)), "{cut} + {n}");
            }
            for start in 0..n {
                let mut front = Range::new(0);
                l[..start].iter().for_each(|h| front.push(*h));
                // Leaves from `start` on, a consistency proof from `start` (when it is one).
                let mut wanted = Vec::new();
                for i in start..n {
                    wanted.extend(inclusion_ranges(i as u64, n as u64).unwrap());
                }
                if start > 0 {
                    wanted.extend(consistency_ranges(start as u64, n as u64).unwrap());
                }
                let mut prover = Prover::new(n as u64, wanted, front);
                for h in &l[start..] {
                    assert!(!prover.is_full());
                    prover.push(*h);
                }
                let (heads, head) = prover.finish().unwrap();
                assert_eq!(head, root(l));
                for i in start..n {
                    let p: Vec<Hash> = inclusion_ranges(i as u64, n as u64)
                        .unwrap()
                        .iter()
                        .map(|r| heads[r])
                        .collect();
                    assert_eq!(
                        p,
                        inclusion_proof(i, l).unwrap(),
                        "leaf {i} of {n} from {start}"
                    );
                }
                if start > 0 {
                    let p: Vec<Hash> = consistency_ranges(start as u64, n as u64)
                        .unwrap()
                        .iter()
                        .map(|r| heads[r])
                        .collect();
                    assert_eq!(p, consistency_proof(start, l).unwrap());
                }
            }
        }
        // A prover short of leaves says which subtree it could not compute.
        let prover = Prover::new(4, inclusion_ranges(0, 4).unwrap(), Range::new(0));
        assert!(prover.finish().is_err());
    }
}
