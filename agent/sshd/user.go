package sshd

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// account is the OS user that sessions run as: the agent's own user.
type account struct {
	Name  string
	Home  string
	Shell string
}

// currentAccount reads the agent's user from the passwd database. os/user
// does not expose the login shell, so /etc/passwd is read directly; a missing
// entry (containers often run with a bare numeric UID) falls back to
// $HOME and /bin/sh rather than refusing service.
func currentAccount(passwdPath string) account {
	uid := os.Getuid()
	acct := account{Name: strconv.Itoa(uid), Home: os.Getenv("HOME"), Shell: "/bin/sh"}
	if acct.Home == "" {
		acct.Home = "/"
	}
	f, err := os.Open(passwdPath)
	if err != nil {
		return acct
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ":")
		if len(fields) < 7 || fields[2] != strconv.Itoa(uid) {
			continue
		}
		acct.Name = fields[0]
		if fields[5] != "" {
			acct.Home = fields[5]
		}
		if fields[6] != "" {
			acct.Shell = fields[6]
		}
		return acct
	}
	return acct
}

func (a account) String() string {
	return fmt.Sprintf("%s (home %s, shell %s)", a.Name, a.Home, a.Shell)
}
