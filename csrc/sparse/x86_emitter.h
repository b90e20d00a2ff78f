// A minimal x86-64 AVX-512 code emitter for the generated algorithm (generated.cpp): the dozen
// instructions its per-layer kernels use, encoded by hand (EVEX), and executable memory that is
// writable only until it is sealed (W^X: mapped read-write, then made read-execute).
//
// Encoding notes (Intel SDM vol. 2, 2.7): EVEX = 62 P0 P1 P2 opcode ModRM [disp].
//   P0 = ~R ~X ~B ~R' 0 0 m m   (R, R': bits 3 and 4 of ModRM.reg; B: bit 3 of ModRM.rm / base;
//                                X: bit 4 of a register ModRM.rm; mm: 1 = 0F, 2 = 0F38)
//   P1 = W ~vvvv 1 p p          (vvvv: the second source register's low four bits; pp: 1 = 66)
//   P2 = z L'L b ~V' a a a      (L'L = 2: 512 bits; b: embedded broadcast; V': bit 4 of vvvv)
// Memory operands are [base + disp]: disp8 when disp is a multiple of the operand's N (64 for a
// full vector, 4 for a broadcast or scalar float; "disp8*N" compression) and disp / N fits a byte,
// disp32 otherwise. Bases are the argument registers rdi, rsi, rdx, rcx, r8, r9 (none needs a SIB byte).
// The general-purpose instructions (the loop count, the tap mask and the weights' base: eax, r10, r11)
// are encoded with their REX prefix and ModRM written out; the stack arguments are read at [rsp + 8k]
// (ModRM rm = 100 takes a SIB byte, 0x24: base rsp, no index).
#pragma once

#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace fastprune {
namespace sparse_cpu {
namespace x86 {

enum Gpr : int { rcx = 1, rdx = 2, rsi = 6, rdi = 7, r8 = 8, r9 = 9, r10 = 10, r11 = 11 };

class Emitter {
 public:
  std::vector<uint8_t> code;

  // zmm[dst] = 64 bytes at [base + disp]
  void load(int dst, Gpr base, int64_t disp) { evex_mem(0x10, 1, 0, dst, 0, base, disp, 64, false); }
  // 64 bytes at [base + disp] = zmm[src]
  void store(int src, Gpr base, int64_t disp) { evex_mem(0x11, 1, 0, src, 0, base, disp, 64, false); }
  // zmm[acc] += zmm[x] * broadcast(float at [base + disp])   (vfmadd231ps zmm, zmm, m32bcst)
  void fma_broadcast(int acc, int x, Gpr base, int64_t disp) { evex_mem(0xB8, 2, 1, acc, x, base, disp, 4, true); }
  // zmm[dst] = broadcast(float at [base + disp])   (vbroadcastss)
  void broadcast(int dst, Gpr base, int64_t disp) { evex_mem(0x18, 2, 1, dst, 0, base, disp, 4, false); }
  // zmm[dst] = zmm[a] + 64 bytes at [base + disp]   (vaddps)
  void add_mem(int dst, int a, Gpr base, int64_t disp) { evex_mem(0x58, 1, 0, dst, a, base, disp, 64, false); }
  // zmm[dst] = 0   (vpxord dst, dst, dst: AVX-512F, where vxorps needs DQ)
  void zero(int dst) { evex_reg(0xEF, 1, 1, dst, dst, dst); }
  // zmm[dst] = max(zmm[a], zmm[b]), b where either is NaN (vmaxps returns its second source then)
  void max(int dst, int a, int b) { evex_reg(0x5F, 1, 0, dst, a, b); }
  // reg += imm   (add r64, imm32)
  void add_imm(Gpr reg, int32_t imm) {
    byte(reg >= 8 ? 0x49 : 0x48);
    byte(0x81);
    byte(0xC0 | (reg & 7));
    dword(imm);
  }
  // reg += the 64-bit stack argument at [rsp + disp]   (add r64, r/m64: REX.W, REX.R for r8-r15)
  void add_stack(Gpr reg, int8_t disp) {
    byte(reg >= 8 ? 0x4C : 0x48);
    byte(0x03);
    byte(static_cast<uint8_t>(0x44 | (reg & 7) << 3));
    byte(0x24);
    byte(static_cast<uint8_t>(disp));
  }
  // eax -= 1; jump to `target` (an earlier offset in code) unless it reached zero (dec eax; jnz rel32)
  void dec_eax_jnz(size_t target) {
    byte(0xFF), byte(0xC8);
    byte(0x0F), byte(0x85);
    dword(static_cast<int32_t>(static_cast<int64_t>(target) - static_cast<int64_t>(code.size() + 4)));
  }
  // eax = the 32-bit stack argument at [rsp + disp] (mov r32, r/m32)
  void mov_eax_stack(int8_t disp) { byte(0x8B), byte(0x44), byte(0x24), byte(static_cast<uint8_t>(disp)); }
  // r10 = the 64-bit stack argument at [rsp + disp] (REX.W R: mov r64, r/m64)
  void mov_r10_stack(int8_t disp) { byte(0x4C), byte(0x8B), byte(0x54), byte(0x24), byte(static_cast<uint8_t>(disp)); }
  // r11 = rdx (REX.W B: mov r/m64, r64)
  void mov_r11_rdx() { byte(0x49), byte(0x89), byte(0xD3); }
  // rdx = r11 + disp (REX.W B: lea r64, [r11 + disp32])
  void lea_rdx_r11(int32_t disp) {
    byte(0x49), byte(0x8D), byte(0x93);
    dword(disp);
  }
  // Skip forward unless bit `bit` of r10 is set: test r10d, imm32 + jz rel32 (a pair the core fuses)
  // below bit 31, bt r10, imm8 + jnc rel32 from there to 63. Returns where to patch the jump's
  // target in (patch_jump).
  size_t jump_unless_r10_bit(int bit) {
    if (bit < 31) {
      byte(0x41), byte(0xF7), byte(0xC2);
      dword(static_cast<int32_t>(uint32_t{1} << bit));
      byte(0x0F), byte(0x84);
    } else {
      byte(0x49), byte(0x0F), byte(0xBA), byte(0xE2), byte(static_cast<uint8_t>(bit));
      byte(0x0F), byte(0x83);
    }
    const size_t at = code.size();
    dword(0);
    return at;
  }
  // The jump whose rel32 lies at `at` lands here.
  void patch_jump(size_t at) {
    const int32_t rel = static_cast<int32_t>(static_cast<int64_t>(code.size()) - static_cast<int64_t>(at + 4));
    for (int i = 0; i < 4; ++i) code[at + i] = static_cast<uint8_t>(static_cast<uint32_t>(rel) >> (8 * i));
  }
  void vzeroupper() { byte(0xC5), byte(0xF8), byte(0x77); }
  void ret() { byte(0xC3); }


 private:
  void byte(uint8_t b) { code.push_back(b); }
  void dword(int32_t v) {
    for (int i = 0; i < 4; ++i) byte(static_cast<uint8_t>(static_cast<uint32_t>(v) >> (8 * i)));
  }
  void prefix(int reg, int vvvv, int rm_high, int rm_b, int mm, int pp, bool bcast) {
    byte(0x62);
    byte(static_cast<uint8_t>(((~reg >> 3) & 1) << 7 | ((~rm_high) & 1) << 6 | ((~rm_b) & 1) << 5 |
                              ((~reg >> 4) & 1) << 4 | mm));
    byte(static_cast<uint8_t>(0 << 7 | ((~vvvv) & 15) << 3 | 1 << 2 | pp));
    byte(static_cast<uint8_t>(2 << 5 | (bcast ? 1 : 0) << 4 | ((~vvvv >> 4) & 1) << 3));
  }
  void evex_mem(uint8_t op, int mm, int pp, int reg, int vvvv, Gpr base, int64_t disp, int64_t n, bool bcast) {
    prefix(reg, vvvv, 0, (base >> 3) & 1, mm, pp, bcast);
    byte(op);
    const bool short_disp = disp % n == 0 && disp / n >= -128 && disp / n <= 127;
    byte(static_cast<uint8_t>((short_disp ? 1 : 2) << 6 | (reg & 7) << 3 | (base & 7)));
    if (short_disp) {
      byte(static_cast<uint8_t>(static_cast<int8_t>(disp / n)));
    } else {
      dword(static_cast<int32_t>(disp));
    }
  }
  void evex_reg(uint8_t op, int mm, int pp, int reg, int vvvv, int rm) {
    prefix(reg, vvvv, rm >> 4, (rm >> 3) & 1, mm, pp, false);
    byte(op);
    byte(static_cast<uint8_t>(3 << 6 | (reg & 7) << 3 | (rm & 7)));
  }
};

// Machine code in memory of its own: written while mapped read-write, then sealed read-execute
// (never both). ok() is false where the system refuses either mapping (the caller falls back).
class ExecutableCode {
 public:
  explicit ExecutableCode(const std::vector<uint8_t>& bytes) : size_(bytes.empty() ? 1 : bytes.size()) {
    void* p = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return;
    std::memcpy(p, bytes.data(), bytes.size());
    if (mprotect(p, size_, PROT_READ | PROT_EXEC) != 0) {
      munmap(p, size_);
      return;
    }
    base_ = static_cast<uint8_t*>(p);
  }
  ~ExecutableCode() {
    if (base_ != nullptr) munmap(base_, size_);
  }
  ExecutableCode(const ExecutableCode&) = delete;
  ExecutableCode& operator=(const ExecutableCode&) = delete;
  bool ok() const { return base_ != nullptr; }
  const uint8_t* at(size_t offset) const { return base_ + offset; }

 private:
  uint8_t* base_ = nullptr;
  size_t size_;
};

}  // namespace x86
}  // namespace sparse_cpu
}  // namespace fastprune
