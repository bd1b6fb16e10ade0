// gemmakit: SentencePiece's BPE encoding over a compact vocabulary; see bpe.h for why and what.

#include "bpe.h"

#include <algorithm>
#include <cstdio>
#include <queue>
#include <stdexcept>
#include <unordered_map>

namespace {

constexpr char kNormal = 1, kUnknown = 2, kUserDefined = 4, kUnused = 5, kByte = 6;  // SentencePiece's piece types

uint64_t fnv1a(std::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// Bytes of the UTF-8 character starting with this byte (SentencePiece's OneCharLen).
int one_char_len(unsigned char lead) { return "\1\1\1\1\1\1\1\1\1\1\1\1\2\2\3\4"[lead >> 4]; }

}  // namespace

int32_t BPEVocab::Table::find(const BPEVocab& v, std::string_view key) const {
  const size_t mask = slots.size() - 1;
  for (size_t i = fnv1a(key) & mask;; i = (i + 1) & mask) {
    const int32_t id = slots[i];
    if (id < 0) return -1;
    if (v.view(id) == key) return id;
  }
}

bool BPEVocab::Table::insert(const BPEVocab& v, int32_t id) {
  const size_t mask = slots.size() - 1;
  const std::string_view key = v.view(id);
  for (size_t i = fnv1a(key) & mask;; i = (i + 1) & mask) {
    if (slots[i] < 0) {
      slots[i] = id;
      return true;
    }
    if (v.view(slots[i]) == key) return false;
  }
}

BPEVocab::BPEVocab(const std::vector<std::string>& pieces, const std::vector<float>& scores, const std::string& types,
                   int64_t unk_id)
    : scores_(scores), types_(types), unk_id_(unk_id) {
  const size_t n = pieces.size();
  if (scores.size() != n || types.size() != n) throw std::invalid_argument("pieces, scores and types differ in length");
  size_t bytes = 0;
  for (const auto& p : pieces) bytes += p.size();
  arena_.reserve(bytes);
  offsets_.reserve(n + 1);
  offsets_.push_back(0);
  for (const auto& p : pieces) {
    arena_ += p;
    offsets_.push_back(static_cast<uint32_t>(arena_.size()));
  }
  size_t slots = 1;
  while (slots < 2 * n + 1) slots <<= 1;
  mergeable_.slots.assign(slots, -1);
  reserved_.slots.assign(slots, -1);
  for (size_t i = 0; i < n; ++i) {
    if (pieces[i].empty()) throw std::invalid_argument("the vocabulary has an empty piece");
    const char t = types_[i];
    const bool mergeable = t == kNormal || t == kUserDefined || t == kUnused;
    if (!(mergeable ? mergeable_ : reserved_).insert(*this, static_cast<int32_t>(i)))
      throw std::invalid_argument("the piece '" + pieces[i] + "' is in the vocabulary twice");
    if (t == kUserDefined)
      user_defined_[static_cast<unsigned char>(pieces[i][0])].push_back(static_cast<int32_t>(i));
  }
  for (auto& ids : user_defined_)
    std::stable_sort(ids.begin(), ids.end(), [this](int32_t a, int32_t b) { return view(a).size() > view(b).size(); });
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    byte_ids_[b] = static_cast<int32_t>(piece_to_id(name));
    if (byte_ids_[b] < 0 || byte_ids_[b] == unk_id_ || types_[byte_ids_[b]] != kByte)
      throw std::invalid_argument(std::string("byte fallback needs the piece ") + name);
  }
  if (unk_id_ < 0 || unk_id_ >= static_cast<int64_t>(n) || types_[unk_id_] != kUnknown)
    throw std::invalid_argument("the vocabulary needs its unknown piece");
}

std::string BPEVocab::piece(int64_t id) const {
  if (id < 0 || id >= size()) throw std::out_of_range("token id outside the vocabulary");
  return std::string(view(static_cast<int32_t>(id)));
}

int64_t BPEVocab::piece_to_id(std::string_view piece) const {
  int32_t id = reserved_.find(*this, piece);
  if (id < 0) id = mergeable_.find(*this, piece);
  return id >= 0 ? id : unk_id_;
}

// Length of the symbol at the start of text: the longest user-defined piece there (never merged),
// else one UTF-8 character.
int BPEVocab::prefix_match(std::string_view text, bool* user_defined) const {
  for (int32_t id : user_defined_[static_cast<unsigned char>(text[0])]) {
    const std::string_view p = view(id);
    if (p.size() <= text.size() && text.compare(0, p.size(), p) == 0) {
      *user_defined = true;
      return static_cast<int>(p.size());
    }
  }
  *user_defined = false;
  return std::min<int>(one_char_len(static_cast<unsigned char>(text[0])), static_cast<int>(text.size()));
}

std::vector<int64_t> BPEVocab::encode(const std::string& text) const {
  // Normalise as Gemma's model does (identity rules, no dummy prefix, whitespace kept): ' ' -> U+2581.
  std::string s;
  s.reserve(text.size() + text.size() / 2);
  for (char c : text) {
    if (c == ' ') s += "\xE2\x96\x81";
    else s += c;
  }
  std::vector<int64_t> out;
  if (s.empty()) return out;

  struct Symbol {
    int prev, next;
    bool frozen;
    std::string_view piece;
  };
  std::vector<Symbol> symbols;
  for (std::string_view rest(s); !rest.empty();) {
    bool frozen = false;
    const int len = prefix_match(rest, &frozen);
    const int index = static_cast<int>(symbols.size());
    symbols.push_back({index - 1, static_cast<size_t>(len) == rest.size() ? -1 : index + 1, frozen, rest.substr(0, len)});
    rest.remove_prefix(len);
  }

  struct Pair {
    int left, right;
    float score;
    size_t size;
  };
  auto later = [](const Pair& a, const Pair& b) { return a.score < b.score || (a.score == b.score && a.left > b.left); };
  std::priority_queue<Pair, std::vector<Pair>, decltype(later)> agenda(later);
  std::unordered_map<std::string_view, std::pair<std::string_view, std::string_view>> unmerge;  // unused pieces
  auto consider = [&](int left, int right) {
    if (left < 0 || right < 0 || symbols[left].frozen || symbols[right].frozen) return;
    const std::string_view merged(symbols[left].piece.data(), symbols[left].piece.size() + symbols[right].piece.size());
    const int32_t id = find_mergeable(merged);
    if (id < 0) return;
    agenda.push({left, right, scores_[id], merged.size()});
    if (types_[id] == kUnused) unmerge[merged] = {symbols[left].piece, symbols[right].piece};
  };
  for (int i = 1; i < static_cast<int>(symbols.size()); ++i) consider(i - 1, i);
  while (!agenda.empty()) {
    const Pair top = agenda.top();
    agenda.pop();
    Symbol& l = symbols[top.left];
    Symbol& r = symbols[top.right];
    if (l.piece.empty() || r.piece.empty() || l.piece.size() + r.piece.size() != top.size) continue;  // stale
    l.piece = std::string_view(l.piece.data(), l.piece.size() + r.piece.size());
    l.next = r.next;
    if (r.next >= 0) symbols[r.next].prev = top.left;
    r.piece = std::string_view();
    consider(l.prev, top.left);
    consider(top.left, l.next);
  }

  auto emit = [&](auto&& self, std::string_view w) -> void {
    const int64_t id = piece_to_id(w);
    // piece_to_id answers unk_id_ (checked when built) for a piece it does not know, never -1
    if (types_[id] == kUnused) {
      const auto it = unmerge.find(w);
      if (it != unmerge.end()) {
        self(self, it->second.first);
        self(self, it->second.second);
        return;
      }
    }
    if (types_[id] == kUnknown) {  // byte fallback
      for (unsigned char b : w) out.push_back(byte_ids_[b]);  // all 256 exist (checked when built)
      return;
    }
    out.push_back(id);
  };
  for (int i = 0; i != -1; i = symbols[i].next) emit(emit, symbols[i].piece);
  return out;
}
