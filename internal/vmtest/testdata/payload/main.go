// Command payload is what the package's VM tests run in the guest. Its first
// argument picks a behaviour:
//
//	exit N     print a few lines (one without a trailing newline) and exit N
//	dmcheck    exit 0 if device-mapper is there (/dev/mapper/control exists
//	           and /proc/misc lists device-mapper), 1 otherwise; then run
//	           each further argument as a command, failing if one fails
//	hang       print "hanging" and sleep forever
//	panic      crash the kernel through /proc/sysrq-trigger
//	orphan     leave a child running that holds stdout open, and exit 0
//	env        print the environment, the working directory and the args
package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: payload exit N | dmcheck | hang | panic | orphan | env")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "exit":
		code, err := strconv.Atoi(os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		fmt.Println("line one")
		fmt.Fprintln(os.Stderr, "line two on stderr")
		fmt.Println("--- FAIL: NotReallyATest (0.00s)")
		fmt.Print("last line without newline")
		os.Exit(code)
	case "dmcheck":
		ok := true
		if _, err := os.Stat("/dev/mapper/control"); err != nil {
			fmt.Println("no /dev/mapper/control:", err)
			ok = false
		}
		misc, err := os.ReadFile("/proc/misc")
		if err != nil || !bytes.Contains(misc, []byte(" device-mapper\n")) {
			fmt.Printf("/proc/misc does not list device-mapper (err %v):\n%s", err, misc)
			ok = false
		}
		mods, _ := os.ReadFile("/proc/modules")
		if !bytes.Contains(mods, []byte("dm_thin_pool ")) {
			fmt.Printf("dm_thin_pool is not loaded; /proc/modules:\n%s", mods)
			ok = false
		}
		if !ok {
			os.Exit(1)
		}
		fmt.Println("device-mapper ok")
		for _, c := range os.Args[2:] {
			f := strings.Fields(c)
			cmd := exec.Command(f[0], f[1:]...)
			cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
			if err := cmd.Run(); err != nil {
				fmt.Printf("%s: %v\n", c, err)
				os.Exit(1)
			}
		}
	case "hang":
		fmt.Println("hanging")
		for {
			time.Sleep(time.Hour)
		}
	case "panic":
		fmt.Println("crashing the kernel")
		if err := os.WriteFile("/proc/sysrq-trigger", []byte("c"), 0); err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		time.Sleep(time.Minute)
	case "orphan":
		cmd := exec.Command("sleep", "1000")
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Start(); err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		fmt.Println("orphaned", cmd.Process.Pid)
	case "env":
		wd, _ := os.Getwd()
		fmt.Println("wd=" + wd)
		for _, a := range os.Args[2:] {
			fmt.Printf("arg=%q\n", a)
		}
		for _, kv := range os.Environ() {
			fmt.Println("env=" + kv)
		}
	default:
		fmt.Fprintln(os.Stderr, "unknown mode", os.Args[1])
		os.Exit(2)
	}
}
