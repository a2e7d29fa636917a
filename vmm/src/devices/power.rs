//! Power control: the ACPI hardware-reduced sleep control and reset registers
//! the FADT points at (see [`crate::linux::acpi`]), and the i8042 keyboard
//! controller's reset line. A guest `poweroff` writes `SLP_TYP(S5) | SLP_EN` to
//! the sleep control register; `reboot` writes the reset value to the reset
//! register (or pulses the i8042 reset). Either ends the run.

use super::{Action, BusDevice};

/// I/O port of the sleep control register (the sleep status register follows).
pub const SLEEP_CONTROL_PORT: u64 = 0x3b0;
/// I/O port of the reset register.
pub const RESET_PORT: u64 = 0x3c0;
/// The value the guest writes to [`RESET_PORT`] to reset.
pub const RESET_VALUE: u8 = 4;
/// `SLP_TYP` of S5 (soft off) declared in the DSDT's `\_S5` object.
pub const S5_SLP_TYP: u8 = 5;
const SLP_EN: u8 = 1 << 5;

/// Sleep control (offset 0) and sleep status (offset 1).
#[derive(Default)]
pub struct SleepRegs;

impl BusDevice for SleepRegs {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        match (offset, data.first()) {
            (0, Some(&v)) if v & SLP_EN != 0 && (v >> 2) & 7 == S5_SLP_TYP => Action::PowerOff,
            (0, Some(&v)) if v & SLP_EN != 0 => {
                log::warn!(
                    "guest asked for sleep type {}; only S5 (power off) exists",
                    (v >> 2) & 7
                );
                Action::None
            }
            _ => Action::None,
        }
    }
}

/// The ACPI reset register.
#[derive(Default)]
pub struct ResetReg;

impl BusDevice for ResetReg {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> Action {
        if data.first() == Some(&RESET_VALUE) {
            Action::Reset
        } else {
            Action::None
        }
    }
}

/// I/O port of the i8042 command register.
pub const I8042_CMD_PORT: u64 = 0x64;

/// The i8042 controller, reduced to its reset command (0xfe); its status reads
/// as "no data, ready" so the kernel's probes end quickly.
#[derive(Default)]
pub struct I8042;

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> Action {
        if data.first() == Some(&0xfe) {
            Action::Reset
        } else {
            Action::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_slp_en_powers_off_and_reset_value_resets() {
        let mut s = SleepRegs;
        assert_eq!(s.write(0, &[(S5_SLP_TYP << 2) | SLP_EN]), Action::PowerOff);
        assert_eq!(s.write(0, &[S5_SLP_TYP << 2]), Action::None);
        assert_eq!(s.write(0, &[(3 << 2) | SLP_EN]), Action::None);
        assert_eq!(ResetReg.write(0, &[RESET_VALUE]), Action::Reset);
        assert_eq!(ResetReg.write(0, &[1]), Action::None);
        assert_eq!(I8042.write(0, &[0xfe]), Action::Reset);
    }
}
