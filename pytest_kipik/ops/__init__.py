"""Operations: finding and removing leftovers (reaper), checking a machine (doctor), logs."""
