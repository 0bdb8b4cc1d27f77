package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	sddbus "github.com/coreos/go-systemd/v22/dbus"

	"github.com/streamer-dev/streamer/config"
	"github.com/streamer-dev/streamer/nodeconfig"
)

// Subcommands dispatch before the daemon's flags are parsed: they are
// run by `streamer-snapshotter NAME ARGS...` and return the exit code.
var subcommands = map[string]func(args []string, stdout, stderr io.Writer) int{
	"install":   runInstall,
	"uninstall": runUninstall,
	"check":     runCheck,
}

// Defaults of the install subcommands.
const (
	defaultContainerdConfig = "/etc/containerd/config.toml"
	defaultUnitDir          = "/etc/systemd/system"
	unitName                = "streamer-snapshotter.service"
	stateFileName           = "install-state.json"
	backupSuffix            = ".streamer-backup-"
	// systemdRunDir exists exactly when systemd is the running init (as
	// sd_booted(3) tests).
	systemdRunDir = "/run/systemd/system"
)

// installState records what install changed, so uninstall undoes exactly
// that. It lives next to the snapshotter config.
type installState struct {
	InstalledAt time.Time `json:"installed_at"`
	// ContainerdConfig is the containerd config file edited.
	ContainerdConfig string `json:"containerd_config"`
	// Backup is the copy of that file taken before the first edit; empty
	// if the file did not exist.
	Backup string `json:"backup,omitempty"`
	// Written is the sha256 of the containerd config as install last wrote
	// it. While the file still has it and Exact holds, uninstall puts the
	// backup back byte for byte (comments included).
	Written string `json:"written,omitempty"`
	// Exact: every change since Backup was made by install.
	Exact bool `json:"exact"`
	// Patch is the keys set, for a key-by-key revert when the file changed.
	Patch nodeconfig.Record `json:"patch"`
	// SnapshotterConfig is the snapshotter config; SnapshotterConfigWritten
	// the sha256 of its content when install created it.
	SnapshotterConfig        string `json:"snapshotter_config"`
	SnapshotterConfigWritten string `json:"snapshotter_config_written,omitempty"`
	// Unit is the systemd unit file install wrote; empty if none.
	Unit string `json:"unit,omitempty"`
	// CopiedBinary is where --copy-binary put the daemon binary when
	// install created that file, as install saw the path; UnitBinary the
	// same file as the unit names it (they differ when install ran in a
	// container with the host directory mounted elsewhere). BinaryWritten
	// is the sha256 of the copy install last wrote: uninstall removes the
	// file only while it still has it.
	CopiedBinary  string `json:"copied_binary,omitempty"`
	UnitBinary    string `json:"unit_binary,omitempty"`
	BinaryWritten string `json:"binary_written,omitempty"`
}

// installFlags are the flags install and uninstall share.
type installFlags struct {
	containerdConfig, config, unitDir, binary, copyBinary, state string
	dryRun, restart                                              bool
}

func parseInstallFlags(name string, args []string, stderr io.Writer) (installFlags, error) {
	var f installFlags
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.containerdConfig, "containerd-config", defaultContainerdConfig, "containerd config file to edit")
	fs.StringVar(&f.config, "config", defaultConfigPath, "streamer-snapshotter config file (written with defaults if absent, else kept)")
	fs.StringVar(&f.unitDir, "unit-dir", defaultUnitDir, "directory of the systemd unit; empty: no unit (the daemon is started some other way)")
	fs.StringVar(&f.binary, "binary", "", "daemon binary the unit runs (default: the --copy-binary destination, else this executable)")
	fs.StringVar(&f.copyBinary, "copy-binary", "", "first copy this executable to this path (replaced atomically when it differs; the unit is then restarted); a containerized installer names the host's --binary through a host mount")
	fs.StringVar(&f.state, "state", "", "install state file (default: install-state.json next to --config)")
	fs.BoolVar(&f.dryRun, "dry-run", false, "print what would change, as unified diffs, and change nothing")
	fs.BoolVar(&f.restart, "restart-containerd", false, "apply at once through systemd: (re)start the unit and restart containerd, only when something changed")
	if err := fs.Parse(args); err != nil {
		return f, err
	}
	if fs.NArg() > 0 {
		return f, fmt.Errorf("%s: unexpected arguments %q", name, fs.Args())
	}
	// Paths end up in the unit and the state file: make them absolute.
	for _, p := range []*string{&f.containerdConfig, &f.config, &f.unitDir, &f.binary, &f.copyBinary, &f.state} {
		if *p == "" {
			continue
		}
		abs, err := filepath.Abs(*p)
		if err != nil {
			return f, fmt.Errorf("%s: %w", name, err)
		}
		*p = abs
	}
	if f.state == "" {
		f.state = filepath.Join(filepath.Dir(f.config), stateFileName)
	}
	return f, nil
}

func runInstall(args []string, stdout, stderr io.Writer) int {
	f, err := parseInstallFlags("install", args, stderr)
	if err == nil {
		err = install(context.Background(), f, stdout)
	}
	return exitCode(err, stderr)
}

func runUninstall(args []string, stdout, stderr io.Writer) int {
	f, err := parseInstallFlags("uninstall", args, stderr)
	if err == nil {
		err = uninstall(context.Background(), f, stdout)
	}
	return exitCode(err, stderr)
}

func exitCode(err error, stderr io.Writer) int {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 2
	}
	fmt.Fprintf(stderr, "streamer-snapshotter: %v\n", err)
	return 1
}

// install writes the snapshotter config, the unit and the containerd
// config edits, records them, and applies them when asked.
func install(ctx context.Context, f installFlags, out io.Writer) error {
	// The snapshotter config: kept when present (it must be valid), else
	// the documented defaults.
	cfg := config.DefaultDaemon()
	var newConfig []byte
	if _, err := os.Stat(f.config); err == nil {
		if cfg, err = config.LoadDaemon(f.config); err != nil {
			return err
		}
		if err := cfg.Validate(); err != nil {
			return fmt.Errorf("invalid config %s: %w", f.config, err)
		}
	} else if errors.Is(err, os.ErrNotExist) {
		var b bytes.Buffer
		if err := cfg.Encode(&b); err != nil {
			return err
		}
		newConfig = b.Bytes()
	} else {
		return fmt.Errorf("stat config: %w", err)
	}

	// The daemon binary, copied from this executable.
	var binOld, binNew []byte
	if f.copyBinary != "" {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("find this executable to copy: %w", err)
		}
		if binNew, err = os.ReadFile(exe); err != nil {
			return fmt.Errorf("read this executable to copy: %w", err)
		}
		if binOld, err = readOptional(f.copyBinary); err != nil {
			return err
		}
	}
	binaryChanged := f.copyBinary != "" && !bytes.Equal(binOld, binNew)

	// The unit.
	var unitPath string
	var unitOld, unitNew []byte
	if f.unitDir != "" {
		binary := f.binary
		if binary == "" {
			binary = f.copyBinary
		}
		if binary == "" {
			exe, err := os.Executable()
			if err != nil {
				return fmt.Errorf("find this executable (pass --binary): %w", err)
			}
			binary = exe
		}
		unitPath = filepath.Join(f.unitDir, unitName)
		unitNew = renderUnit(binary, f.config)
		var err error
		if unitOld, err = readOptional(unitPath); err != nil {
			return err
		}
	}

	// The containerd config.
	orig, err := readOptional(f.containerdConfig)
	if err != nil {
		return err
	}
	patched, rec, err := nodeconfig.Apply(orig, nodeconfig.Options{Address: cfg.Address})
	if err != nil {
		return fmt.Errorf("edit %s: %w", f.containerdConfig, err)
	}
	containerdChanged := !bytes.Equal(orig, patched)
	unitChanged := unitPath != "" && !bytes.Equal(unitOld, unitNew)

	if f.dryRun {
		if binaryChanged {
			fmt.Fprintf(out, "would copy this executable to %s\n", f.copyBinary)
		}
		if newConfig != nil {
			fmt.Fprint(out, nodeconfig.Diff("/dev/null", f.config, nil, newConfig))
		}
		if unitChanged {
			fmt.Fprint(out, nodeconfig.Diff(unitPath, unitPath, unitOld, unitNew))
		}
		if containerdChanged {
			fmt.Fprint(out, nodeconfig.Diff(f.containerdConfig, f.containerdConfig, orig, patched))
			if hasComments(orig) {
				fmt.Fprintf(out, "# note: comments and formatting of %s would be lost (a backup is kept)\n", f.containerdConfig)
			}
		}
		if newConfig == nil && !binaryChanged && !unitChanged && !containerdChanged {
			fmt.Fprintln(out, "dry run: already installed, nothing would change")
		}
		return nil
	}

	st, hadState, err := loadState(f.state)
	if err != nil {
		return err
	}
	if !hadState {
		st = installState{ContainerdConfig: f.containerdConfig, SnapshotterConfig: f.config, Exact: true}
	}
	stateChanged := false

	if binaryChanged {
		// Renamed into place: a running daemon keeps its old file.
		if err := writeAtomic(f.copyBinary, binNew, 0o755); err != nil {
			return err
		}
		if binOld == nil && st.CopiedBinary == "" {
			st.CopiedBinary, st.UnitBinary = f.copyBinary, f.binary
		}
		if st.CopiedBinary == f.copyBinary {
			st.BinaryWritten = digestOf(binNew)
		}
		stateChanged = true
		fmt.Fprintf(out, "copied this executable to %s\n", f.copyBinary)
	} else if f.copyBinary != "" {
		fmt.Fprintf(out, "unchanged %s\n", f.copyBinary)
	}

	if newConfig != nil {
		if err := writeAtomic(f.config, newConfig, 0o600); err != nil {
			return err
		}
		st.SnapshotterConfigWritten = digestOf(newConfig)
		stateChanged = true
		fmt.Fprintf(out, "wrote %s (defaults)\n", f.config)
	} else {
		fmt.Fprintf(out, "kept %s\n", f.config)
	}

	if unitChanged {
		if err := writeAtomic(unitPath, unitNew, 0o644); err != nil {
			return err
		}
		if st.Unit == "" && unitOld == nil {
			st.Unit = unitPath
			stateChanged = true
		}
		fmt.Fprintf(out, "wrote %s\n", unitPath)
	} else if unitPath != "" {
		fmt.Fprintf(out, "unchanged %s\n", unitPath)
	}

	if containerdChanged {
		if st.Written != "" && st.Written != digestOf(orig) {
			// Edited by someone else since install last wrote it: the
			// backup no longer holds all of its other settings.
			st.Exact = false
		}
		if orig != nil {
			backup := f.containerdConfig + backupSuffix + time.Now().UTC().Format("20060102T150405Z")
			if err := os.WriteFile(backup, orig, 0o600); err != nil {
				return fmt.Errorf("back up %s: %w", f.containerdConfig, err)
			}
			if st.Backup == "" {
				st.Backup = backup
			}
			fmt.Fprintf(out, "backed up %s to %s\n", f.containerdConfig, backup)
		}
		mode := os.FileMode(0o644)
		if fi, err := os.Stat(f.containerdConfig); err == nil {
			mode = fi.Mode().Perm()
		}
		if err := writeAtomic(f.containerdConfig, patched, mode); err != nil {
			return err
		}
		if hadState {
			st.Patch = st.Patch.Merge(rec)
		} else {
			st.Patch = rec
		}
		st.Written = digestOf(patched)
		stateChanged = true
		for _, c := range rec.Changes {
			fmt.Fprintf(out, "set %s = %#v in %s\n", nodeconfig.KeyString(c.Key), c.New, f.containerdConfig)
		}
		if hasComments(orig) {
			fmt.Fprintf(out, "note: comments and formatting of %s were not kept; see the backup\n", f.containerdConfig)
		}
	} else {
		fmt.Fprintf(out, "unchanged %s (already configured)\n", f.containerdConfig)
	}

	if stateChanged {
		st.InstalledAt = time.Now().UTC()
		if err := saveState(f.state, st); err != nil {
			return err
		}
	}

	// A new binary needs the daemon restarted, not containerd.
	restartUnit := unitChanged || (binaryChanged && unitPath != "")
	if !restartUnit && !containerdChanged {
		return nil
	}
	if !f.restart {
		fmt.Fprintln(out, "next: start streamer-snapshotter (systemctl daemon-reload && systemctl enable --now streamer-snapshotter), then systemctl restart containerd; or rerun with --restart-containerd")
		return nil
	}
	return applyInstall(ctx, out, restartUnit, containerdChanged, unitPath, cfg.Address)
}

// applyInstall (re)starts the unit (when written, or its binary replaced)
// and restarts containerd once the snapshotter's socket is up.
func applyInstall(ctx context.Context, out io.Writer, unitChanged, containerdChanged bool, unitPath, socket string) error {
	if !systemdRunning() {
		fmt.Fprintf(out, "NOT restarted: systemd is not running here (%s is absent). Start streamer-snapshotter, then restart containerd with your init system; containerd reads its config only at start.\n", systemdRunDir)
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	sd, err := sddbus.NewSystemdConnectionContext(ctx)
	if err != nil {
		return fmt.Errorf("connect to systemd (/run/systemd/private): %w", err)
	}
	defer sd.Close()
	if unitChanged {
		if err := sd.ReloadContext(ctx); err != nil {
			return fmt.Errorf("systemd daemon-reload: %w", err)
		}
		if _, _, err := sd.EnableUnitFilesContext(ctx, []string{unitPath}, false, true); err != nil {
			return fmt.Errorf("enable %s: %w", unitName, err)
		}
		if err := unitJob(ctx, sd.RestartUnitContext, unitName); err != nil {
			return err
		}
		fmt.Fprintf(out, "started %s\n", unitName)
	}
	// With a unit, containerd waits until the snapshotter serves. Without
	// one the daemon is started some other way, maybe later: containerd
	// dials it lazily, restart at once.
	if unitPath != "" {
		if err := waitServing(ctx, socket); err != nil {
			return fmt.Errorf("containerd NOT restarted: %w", err)
		}
	}
	if containerdChanged {
		if err := unitJob(ctx, sd.RestartUnitContext, "containerd.service"); err != nil {
			return err
		}
		fmt.Fprintln(out, "restarted containerd.service")
	}
	return nil
}

// unitJob runs a systemd job (start, stop, restart) and waits for its result.
func unitJob(ctx context.Context, job func(context.Context, string, string, chan<- string) (int, error), unit string) error {
	done := make(chan string, 1)
	if _, err := job(ctx, unit, "replace", done); err != nil {
		return fmt.Errorf("systemd job on %s: %w", unit, err)
	}
	select {
	case r := <-done:
		if r != "done" {
			return fmt.Errorf("systemd job on %s: %s (see journalctl -u %s)", unit, r, unit)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("systemd job on %s: %w", unit, ctx.Err())
	}
}

// waitServing waits until the snapshotter accepts connections.
func waitServing(ctx context.Context, path string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("snapshotter socket %s not serving: %w", path, err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// uninstall undoes what the state file records.
func uninstall(ctx context.Context, f installFlags, out io.Writer) error {
	st, ok, err := loadState(f.state)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("no install state at %s: nothing recorded to undo (pass --state if it lives elsewhere)", f.state)
	}

	cur, err := readOptional(st.ContainerdConfig)
	if err != nil {
		return err
	}
	var restored []byte // nil: remove the file
	how := ""
	switch {
	case cur != nil && st.Exact && digestOf(cur) == st.Written && st.Backup != "":
		if restored, err = os.ReadFile(st.Backup); err != nil {
			return fmt.Errorf("read backup: %w", err)
		}
		how = "restored byte for byte from " + st.Backup
	case cur != nil && st.Exact && digestOf(cur) == st.Written && st.Patch.CreatedFile:
		how = "removed (install created it)"
	case cur == nil:
		how = "absent, left absent"
	default:
		var warnings []string
		restored, warnings, err = nodeconfig.Revert(cur, st.Patch)
		if err != nil {
			return fmt.Errorf("revert %s: %w", st.ContainerdConfig, err)
		}
		for _, w := range warnings {
			fmt.Fprintf(out, "warning: %s: %s\n", st.ContainerdConfig, w)
		}
		how = "reverted key by key (edited since install)"
		if restored == nil {
			how = "removed (install created it)"
		}
	}
	unitPath := st.Unit
	if f.dryRun {
		if cur != nil {
			fmt.Fprint(out, nodeconfig.Diff(st.ContainerdConfig, st.ContainerdConfig, cur, restored))
		}
		if unitPath != "" {
			fmt.Fprintf(out, "would remove %s\n", unitPath)
		}
		return nil
	}
	if cur != nil {
		if restored == nil {
			if err := os.Remove(st.ContainerdConfig); err != nil {
				return fmt.Errorf("remove %s: %w", st.ContainerdConfig, err)
			}
		} else if !bytes.Equal(cur, restored) {
			mode := os.FileMode(0o644)
			if fi, err := os.Stat(st.ContainerdConfig); err == nil {
				mode = fi.Mode().Perm()
			}
			if err := writeAtomic(st.ContainerdConfig, restored, mode); err != nil {
				return err
			}
		}
	}
	fmt.Fprintf(out, "%s: %s\n", st.ContainerdConfig, how)

	var sd *sddbus.Conn
	if f.restart && systemdRunning() {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		ctx = cctx
		if sd, err = sddbus.NewSystemdConnectionContext(ctx); err != nil {
			return fmt.Errorf("connect to systemd: %w", err)
		}
		defer sd.Close()
		// containerd first: it must stop using the snapshotter before the
		// snapshotter goes away.
		if err := unitJob(ctx, sd.RestartUnitContext, "containerd.service"); err != nil {
			return err
		}
		fmt.Fprintln(out, "restarted containerd.service")
		if unitPath != "" {
			if err := unitJob(ctx, sd.StopUnitContext, unitName); err != nil {
				return err
			}
			if _, err := sd.DisableUnitFilesContext(ctx, []string{unitName}, false); err != nil {
				return fmt.Errorf("disable %s: %w", unitName, err)
			}
			fmt.Fprintf(out, "stopped and disabled %s\n", unitName)
		}
	} else if f.restart {
		fmt.Fprintf(out, "NOT restarted: systemd is not running here (%s is absent). Restart containerd, then stop streamer-snapshotter.\n", systemdRunDir)
	}
	if unitPath != "" {
		if err := os.Remove(unitPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove unit: %w", err)
		}
		fmt.Fprintf(out, "removed %s\n", unitPath)
		if sd != nil {
			if err := sd.ReloadContext(ctx); err != nil {
				return fmt.Errorf("systemd daemon-reload: %w", err)
			}
		}
	}
	if st.BinaryWritten != "" {
		// The path as install saw it, else as the unit names it (install
		// ran in a container, uninstall runs on the host).
		for _, p := range []string{st.CopiedBinary, st.UnitBinary} {
			if b, err := os.ReadFile(p); p != "" && err == nil {
				if digestOf(b) != st.BinaryWritten {
					fmt.Fprintf(out, "kept %s (replaced since install)\n", p)
					break
				}
				if err := os.Remove(p); err != nil {
					return fmt.Errorf("remove %s: %w", p, err)
				}
				fmt.Fprintf(out, "removed %s (copied by install)\n", p)
				break
			}
		}
	}
	if st.SnapshotterConfigWritten != "" {
		if b, err := os.ReadFile(st.SnapshotterConfig); err == nil && digestOf(b) == st.SnapshotterConfigWritten {
			if err := os.Remove(st.SnapshotterConfig); err != nil {
				return fmt.Errorf("remove %s: %w", st.SnapshotterConfig, err)
			}
			fmt.Fprintf(out, "removed %s (unchanged defaults)\n", st.SnapshotterConfig)
		} else if err == nil {
			fmt.Fprintf(out, "kept %s (edited since install)\n", st.SnapshotterConfig)
		}
	}
	if err := os.Remove(f.state); err != nil {
		return fmt.Errorf("remove install state: %w", err)
	}
	if !f.restart {
		fmt.Fprintln(out, "next: systemctl restart containerd, then systemctl disable --now streamer-snapshotter (drain the node first: running containers may use streamed layers)")
	}
	return nil
}

// renderUnit is the systemd unit running the daemon.
func renderUnit(binary, configPath string) []byte {
	return []byte(fmt.Sprintf(`# Written by streamer-snapshotter install; removed by streamer-snapshotter uninstall.
[Unit]
Description=Streamer snapshotter (containerd remote snapshotter)
Documentation=https://github.com/streamer-dev/streamer/blob/main/docs/install.md
After=local-fs.target network-online.target
Wants=network-online.target
# containerd dials the proxy plugin lazily, but CRI pulls fail until the
# snapshotter serves: start it first.
Before=containerd.service

[Service]
Type=simple
ExecStartPre=-/sbin/modprobe fuse
ExecStart=%s --config %s
Restart=always
RestartSec=1
# SIGTERM goes to the daemon alone so it can unmount its layers; whatever
# is left in the cgroup after TimeoutStopSec is killed.
KillMode=process
TimeoutStopSec=30
# Each mounted layer holds file descriptors; many images, many layers.
LimitNOFILE=1048576
# The FUSE daemon must not be the one the OOM killer picks.
OOMScoreAdjust=-999

[Install]
WantedBy=multi-user.target
`, binary, configPath))
}

func systemdRunning() bool {
	fi, err := os.Stat(systemdRunDir)
	return err == nil && fi.IsDir()
}

func loadState(path string) (installState, bool, error) {
	var st installState
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return st, false, nil
	}
	if err != nil {
		return st, false, fmt.Errorf("read install state: %w", err)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, false, fmt.Errorf("install state %s: %w", path, err)
	}
	return st, true, nil
}

func saveState(path string, st installState) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode install state: %w", err)
	}
	return writeAtomic(path, append(b, '\n'), 0o600)
}

// readOptional reads a file; an absent file is nil, no error.
func readOptional(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return b, nil
}

// writeAtomic writes a file whole or not at all: a crash never leaves
// containerd a half-written config.
func writeAtomic(path string, b []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("create directory of %s: %w", path, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func digestOf(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func hasComments(b []byte) bool {
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), "#") {
			return true
		}
	}
	return false
}
