// gemmakit: SentencePiece's BPE encoding over a compact vocabulary (tokenizer.py, GGUF vocabularies).
//
// sentencepiece's processor holds Gemma's 262k-piece vocabulary as a parsed protobuf plus hash maps,
// ~43 MB resident for the whole run. The same encoding needs only the pieces' bytes (2.3 MB), their
// scores and types, and two hash tables of ids: ~9 MB. The algorithm is SentencePiece's (bpe_model.cc,
// normalizer.cc) step for step, so the ids are the same: spaces escaped to U+2581, the text split into
// characters and user-defined pieces (longest first, never merged), the adjacent pair whose merge is a
// piece with the highest score merged first (leftmost on ties) until none is, unused pieces split back
// into what they were merged from, and unknown pieces spelt as their UTF-8 bytes' <0xXX> pieces.

#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

class BPEVocab {
 public:
  // pieces[i], scores[i] and types[i] (SentencePiece's: 1 normal, 2 unknown, 3 control, 4 user-defined,
  // 5 unused, 6 byte) of every id; unk_id the unknown piece's id (-1: none).
  BPEVocab(const std::vector<std::string>& pieces, const std::vector<float>& scores, const std::string& types,
           int64_t unk_id);

  std::vector<int64_t> encode(const std::string& text) const;
  std::string piece(int64_t id) const;
  // SentencePiece's PieceToId: control/unknown/byte pieces first, then the others; unk_id if neither.
  int64_t piece_to_id(std::string_view piece) const;
  int64_t size() const { return static_cast<int64_t>(scores_.size()); }

 private:
  struct Table {  // open addressing over ids, keyed by the pieces' bytes
    std::vector<int32_t> slots;
    int32_t find(const BPEVocab& v, std::string_view key) const;
    bool insert(const BPEVocab& v, int32_t id);  // false: the piece is already there
  };
  std::string_view view(int32_t id) const {
    return std::string_view(arena_.data() + offsets_[id], offsets_[id + 1] - offsets_[id]);
  }
  int prefix_match(std::string_view text, bool* user_defined) const;
  int32_t find_mergeable(std::string_view piece) const { return mergeable_.find(*this, piece); }

  std::string arena_;              // every piece's bytes, back to back
  std::vector<uint32_t> offsets_;  // piece i is arena_[offsets_[i], offsets_[i + 1])
  std::vector<float> scores_;
  std::string types_;
  Table mergeable_, reserved_;     // normal/user-defined/unused pieces; control/unknown/byte pieces
  std::vector<int32_t> user_defined_[256];  // ids of user-defined pieces by first byte, longest first
  int32_t byte_ids_[256];
  int64_t unk_id_;
};
